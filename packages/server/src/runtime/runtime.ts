/**
 * The runtime interface now lives in @podflare/runtime (the boundary a driver implements); this
 * module re-exports it for the server's own code.
 */
export type * from '@podflare/runtime';
