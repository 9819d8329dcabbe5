-- postgres-migrations disable-transaction
-- 'disabled': a root key version switched off in an emergency (keyring.disable_key).
-- Alone in its file and outside a transaction: a value added to an enum cannot be used in
-- the transaction that adds it, so nothing here or in earlier migrations uses it.
ALTER TYPE keyring.key_state ADD VALUE IF NOT EXISTS 'disabled' AFTER 'active';
