/**
 * @podflare/runtime: the boundary between the sandbox manager and the runtimes that run sandboxes.
 * A driver implements `Runtime<S>` for its own sandbox type `S`, hands back an `AgentClient` per
 * sandbox, and registers under a name in a `RuntimeRegistry`.
 */
export * from './agent-client.js';
export * from './names.js';
export * from './registry.js';
export * from './runtime.js';
export * from './sandbox-error.js';
