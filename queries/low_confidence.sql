-- Low-confidence predictions to review: probability of the best finest cell below
-- max_probability, least confident first, with the runner-up and the margin between them
-- (a small margin: the model hesitates between two places).
-- Parameters: max_probability (default 0.2).
-- Needs: --predictions PRED_DIR
-- Example: geosurge sql index/ --predictions preds/ -f queries/low_confidence.sql \
--              --param max_probability=0.1 --format csv --output review.csv
SET VARIABLE max_probability = coalesce(getvariable('max_probability'), 0.2);
SELECT p.id,
       p.path,
       round(p.probability, 4)                                   AS probability,
       round(p.topk_probs[2], 4)                                 AS runner_up_probability,
       round(p.probability - coalesce(p.topk_probs[2], 0), 4)    AS margin,
       p.lat,
       p.lon,
       c.town,
       c.country_name
FROM predictions p
LEFT JOIN cells c ON c.level = (SELECT max(level) FROM cells) AND c.cell_index = p.cell_l7
WHERE p.error IS NULL
  AND p.probability < getvariable('max_probability')
ORDER BY p.probability, p.id;
