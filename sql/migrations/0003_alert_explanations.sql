-- Payguard schema, version 3: why the model flagged an alert. For alerts scored by a model, the
-- features that pushed the score most, by occlusion (each feature replaced by its training
-- baseline; contribution = score - occluded score): a JSON array of
-- {feature, value, baseline, contribution}, largest |contribution| first. NULL without a model.
ALTER TABLE alerts ADD COLUMN IF NOT EXISTS explanation jsonb;
