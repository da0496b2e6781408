export { loadConfig, type ServerConfig, type RuntimeName } from './config.js';
export { startServer, type RunningServer, type StartOptions } from './server.js';
export { AUTO_RUNTIME, RuntimeRegistry, type RuntimeDriver } from '@podflare/runtime';
export { builtinRuntimes } from './runtime/drivers.js';
export { templateRuntimeNames } from './runtime/driver-context.js';
export type { DriverContext, DriverImageOptions, RuntimeSettings, ServerDriver, ServerRuntimes } from './runtime/driver-context.js';
/** The JSON-lines AgentClient, for drivers whose agent speaks over a socket. */
export { AgentChannel } from './agent-channel.js';
export type { HttpMount, MountCaller } from './http/mounts.js';
export * from './image/index.js';
export * from './doctor.js';
export { createLogger, type Logger, type LogLevel } from './log.js';
// Cluster mode (`podflare node`, `podflare gateway`) is `@podflare/server/cluster`: not loaded
// here, so that `podflare serve` starts without PostgreSQL's driver and the gateway.
