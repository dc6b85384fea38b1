-- Inputs that could not be used, by kind of error (zero_bytes, not_an_image, truncated, ...),
-- with an example of each.
-- Needs: --predictions PRED_DIR
-- Example: geosurge sql index/ --predictions preds/ -f queries/error_kinds.sql
SELECT split_part(error, ':', 1)  AS kind,
       count(*)                   AS inputs,
       min(path)                  AS example_path,
       min(error)                 AS example_error
FROM predictions
WHERE error IS NOT NULL
GROUP BY kind
ORDER BY inputs DESC, kind;
