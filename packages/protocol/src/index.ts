export * from './errors.js';
export * from './events.js';
export * from './sandbox.js';
export * from './spec.js';
export * from './agent.js';
export * from './api.js';
export * from './egress.js';
export * from './browser-access.js';
export type * from './dashboard.js';
