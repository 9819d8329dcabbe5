// The crypto core: pure functions over buffers, no I/O, no configuration.
export * from './errors.js';
export * from './secret.js';
export * from './keys.js';
export * from './aead.js';
export * from './hkdf.js';
export * from './format.js';
export * from './wrap.js';
export * from './blind-index.js';
