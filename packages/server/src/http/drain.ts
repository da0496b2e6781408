/** Waiting for a slow HTTP client: the one place backpressure from a response is turned into a promise. */
import type { Writable } from 'node:stream';

/** Resolves once `res` has drained (or closed: a client that left frees the writer too), leaving no listener behind. */
export function drainedOrClosed(res: Writable): Promise<void> {
  if (res.destroyed || res.writableEnded) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      res.off('drain', done);
      res.off('close', done);
      resolve();
    };
    res.on('drain', done);
    res.on('close', done);
  });
}
