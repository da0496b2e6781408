/**
 * `podflare demo`: the quick start's main act. Starts a server in this process, then through the
 * SDK: a sandbox loads a small pandas DataFrame, forks into three children that each fit a
 * different model, the best child is merged back into the parent, and everything is cleaned up.
 * Every step prints its duration.
 */
import net from 'node:net';
import path from 'node:path';
import { loadConfig, startServer } from '@podflare/server';
import { Client, PodflareError, Sandbox, type Execution } from 'podflare';
import { enumOption, EXIT_FAILURE, EXIT_OK, formatMs, intOption, parse, type Command } from '../args.js';
import { imageProgress } from '../image-progress.js';

const HELP = `Usage: podflare demo [options]

Starts a Podflare server in this process and walks through the main features with the SDK:
create a sandbox, load a pandas DataFrame, fork it into 3 children that each fit a different
model, diff them, merge the best back into the parent, then clean up. Builds the sandbox
image first if needed (about a minute, once; needs root).

Options:
  --host URL         use this running server instead of starting one in-process
  --state-dir DIR    server state (default: $PODFLARE_STATE_DIR, else /var/lib/podflare)
  --images-dir DIR   built images (default: $PODFLARE_IMAGES_DIR, else <state dir>/images)
  --pool-size N      warm sandboxes (default: the server's)
  --log-level LEVEL  server log level (default: warn, to keep the demo readable)
  -h, --help         show this help
`;

export const LOAD_DATA = `
import numpy as np, pandas as pd
rng = np.random.default_rng(7)
x = np.linspace(0, 4, 24)
df = pd.DataFrame({"x": x.round(3), "y": (0.8 * x**2 - 1.5 * x + 2 + rng.normal(0, 0.4, x.size)).round(3)})
print(f"{len(df)} rows, columns {list(df.columns)}")
df.head(8)
`;

/** Each child fits a polynomial of its own degree and scores it on held-out rows. */
export const FIT = (degree: number) => `
deg = ${degree}
train, valid = df.iloc[::2], df.iloc[1::2]
coef = np.polyfit(train.x, train.y, deg)
df["pred"] = np.polyval(coef, df.x).round(3)
rmse = float(np.sqrt(((np.polyval(coef, valid.x) - valid.y) ** 2).mean()))
with open("/root/model.txt", "w") as f:
    f.write(f"degree={deg} rmse={rmse:.4f} coef={np.round(coef, 3).tolist()}\\n")
print(f"degree {deg}: validation RMSE {rmse:.4f}")
rmse
`;

export const SHOW_STATE = `
print(open("/root/model.txt").read().strip())
df[["x", "y", "pred"]].head(6)
`;

/** A port nobody listens on right now (the demo must not collide with a running \`podflare serve\`). */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

/** Fork/diff/merge answered "not there (yet)": a server without the feature, not a failure. */
function notImplemented(err: unknown): err is PodflareError {
  return err instanceof PodflareError && (err.status === 404 || err.status === 501);
}

function indent(text: string, prefix = '    '): string {
  return text.replace(/\n$/, '').split('\n').map((l) => prefix + l).join('\n') + '\n';
}

export const demoCommand: Command = {
  name: 'demo',
  summary: 'start a server in-process and show create / fork / diff / merge',
  help: HELP,
  async run(argv) {
    const { values } = parse('demo', argv, {
      host: { type: 'string' },
      'state-dir': { type: 'string' },
      'images-dir': { type: 'string' },
      'pool-size': { type: 'string' },
      'log-level': { type: 'string' },
    });
    const out = (s: string) => process.stdout.write(s);
    const t0 = Date.now();
    let stepNo = 0;
    /** Runs one step, printing its name before and its duration after. */
    const step = async <T>(title: string, fn: () => Promise<T>): Promise<T> => {
      stepNo++;
      out(`\n[${formatMs(Date.now() - t0).padStart(6)}] ${stepNo}. ${title}\n`);
      const t = Date.now();
      const result = await fn();
      out(`    (${formatMs(Date.now() - t)})\n`);
      return result;
    };
    const runOrThrow = async (sbx: Sandbox, code: string, label: string): Promise<Execution> => {
      const ex = await sbx.runCode(code);
      if (ex.stdout) out(indent(ex.stdout));
      if (ex.stderr) process.stderr.write(indent(ex.stderr));
      if (ex.error || ex.exitCode !== 0) {
        throw new Error(`${label} failed in ${sbx.id}: ${ex.error ? `${ex.error.name}: ${ex.error.value}` : `exit ${ex.exitCode}`}`);
      }
      return ex;
    };

    const config = values.host ? undefined : loadConfig({
      onStop: 'destroy', // a demo cleans up after itself
      stateDir: path.resolve(values['state-dir'] ?? process.env.PODFLARE_STATE_DIR ?? '/var/lib/podflare'),
      imagesDir: values['images-dir'] ? path.resolve(values['images-dir']) : undefined,
      host: '127.0.0.1',
      port: await freePort(),
      poolSize: intOption(values['pool-size'], 'pool-size', 0, 64, 'demo'),
      logLevel: enumOption(values['log-level'], 'log-level', ['debug', 'info', 'warn', 'error', 'silent'] as const, 'demo') ?? 'warn',
    });

    const server = config
      ? await step(`starting the server (state in ${config.stateDir})`, async () => {
          const reporter = imageProgress({ quiet: true });
          try {
            return await startServer(config, { onImageProgress: reporter.onProgress });
          } finally {
            reporter.finish();
          }
        })
      : undefined;
    const client = new Client({ host: server?.url ?? values.host });
    const sandboxes: Sandbox[] = [];
    let status = EXIT_OK;
    try {
      await step(`waiting for ${client.host}/v1/healthz`, () => client.health());

      const parent = await step('creating a sandbox', async () => {
        const s = await Sandbox.create({ client });
        sandboxes.push(s);
        out(`    ${s.id}\n`);
        return s;
      });

      await step('loading a pandas DataFrame in it', async () => {
        const ex = await runOrThrow(parent, LOAD_DATA, 'loading the data');
        if (ex.text) out(indent(ex.text));
      });

      const children = await step('forking it into 3 children (memory and files copied)', async () => {
        try {
          const c = await parent.fork(3);
          sandboxes.push(...c);
          out(c.map((s) => `    ${s.id}\n`).join(''));
          return c;
        } catch (err) {
          if (!notImplemented(err)) throw err;
          out(`    note: this server does not implement fork yet (HTTP ${err.status}: ${err.message}); skipping fork, diff and merge\n`);
          return undefined;
        }
      });

      if (children) {
        const scores = await step('each child fits a different model (polynomial degree 1, 2, 3) in parallel', async () =>
          Promise.all(
            children.map(async (child, i) => {
              const ex = await runOrThrow(child, FIT(i + 1), `fitting degree ${i + 1}`);
              const rmse = Number(ex.text);
              if (!Number.isFinite(rmse)) throw new Error(`child ${child.id} returned no score (got ${ex.text ?? 'nothing'})`);
              return rmse;
            }),
          ),
        );
        const best = scores.indexOf(Math.min(...scores));
        const winner = children[best]!;

        await step(`diff of the parent against the best child (degree ${best + 1}, ${winner.id})`, async () => {
          try {
            const d = await parent.diff(winner, { paths: ['/root'], content: true, vars: true });
            out(`    added:    ${d.added.join(', ') || '-'}\n    modified: ${d.modified.join(', ') || '-'}\n    removed:  ${d.removed.join(', ') || '-'}\n`);
            for (const patch of Object.values(d.content ?? {})) out(indent(patch, '    '));
            if (d.vars && Object.keys(d.vars).length) out(indent(`variables: ${JSON.stringify(d.vars)}`.slice(0, 600)));
          } catch (err) {
            if (!notImplemented(err)) throw err;
            out(`    note: this server does not implement diff yet (HTTP ${err.status}); skipping\n`);
          }
        });

        const merged = await step('merging the best child into the parent', async () => {
          try {
            await parent.mergeInto(winner);
            out(`    ${parent.id} now carries the state of ${winner.id} (which is retired)\n`);
            return true;
          } catch (err) {
            if (!notImplemented(err)) throw err;
            out(`    note: this server does not implement merge yet (HTTP ${err.status}); skipping\n`);
            return false;
          }
        });

        if (merged) {
          await step("the parent's state after the merge", async () => {
            const ex = await runOrThrow(parent, SHOW_STATE, 'reading the merged state');
            if (ex.text) out(indent(ex.text));
          });
        }
      }
    } catch (err) {
      process.stderr.write(`\npodflare demo failed: ${(err as Error).message}\n`);
      status = EXIT_FAILURE;
    } finally {
      const what = `closing ${sandboxes.length} sandbox${sandboxes.length === 1 ? '' : 'es'}${server ? ' and stopping the server' : ''}`;
      await step(what, async () => {
        const results = await Promise.allSettled(sandboxes.map((s) => s.close()));
        const failed = results.filter((r) => r.status === 'rejected');
        if (failed.length) out(`    ${failed.length} could not be closed: ${(failed[0] as PromiseRejectedResult).reason}\n`);
        client.close();
        await server?.close();
      }).catch((err: unknown) => {
        process.stderr.write(`podflare demo: cleanup failed: ${(err as Error).message}\n`);
        status = EXIT_FAILURE;
      });
    }
    out(`\n${status === EXIT_OK ? 'demo finished' : 'demo failed'} in ${formatMs(Date.now() - t0)}\n`);
    return status;
  },
};
