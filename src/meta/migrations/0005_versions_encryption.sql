-- sqlferry metadata, migration 5: the key id of an encrypted version in the S3 store's
-- versions index (docs/security.md, "The S3 store"), so that `versions` lists it as the
-- directory store does. NULL for a plaintext version, and for every row written before
-- (an S3 store kept no encrypted version before this migration). The version's seal is
-- kept in its object only: every read of a version GETs its object anyway.
ALTER TABLE sqlferry_versions ADD COLUMN encryption_key_id TEXT;
