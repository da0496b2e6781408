export { loadConfig, type ServerConfig, type RuntimeName } from './config.js';
export { startServer, type RunningServer, type StartOptions } from './server.js';
export { ensureImage, type ImagePaths, type ImageProgress } from './image/index.js';
export { runDoctor, formatDoctorReport, type DoctorReport } from './doctor.js';
export { createLogger, type Logger, type LogLevel } from './log.js';
