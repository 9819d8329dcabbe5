export * from './material.js';
export * from './errors.js';
export * from './key-source.js';
export * from './root-keys.js';
export * from './lru.js';
export * from './data-keys.js';
export * from './index-keys.js';
