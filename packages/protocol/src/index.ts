export * from './errors.js';
export * from './events.js';
export * from './agent.js';
export * from './api.js';
export * from './egress.js';
export type * from './dashboard.js';
