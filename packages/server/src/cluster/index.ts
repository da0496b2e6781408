/** Cluster mode: `podflare node` and `podflare gateway` (see node.ts and gateway.ts). */
export { startNode, type NodeOptions, type RunningNode } from './node.js';
export { startGateway, IDEMPOTENCY_METADATA_KEY, type GatewayOptions, type RunningGateway } from './gateway.js';
export { NODE_TOKEN_HEADER } from './node-token.js';
