export { loadConfig, type ServerConfig, type RuntimeName } from './config.js';
export { startServer, type RunningServer, type StartOptions } from './server.js';
export type { HttpMount, MountCaller } from './http/mounts.js';
export * from './image/index.js';
export * from './doctor.js';
export { createLogger, type Logger, type LogLevel } from './log.js';
export * from './cluster/index.js';
