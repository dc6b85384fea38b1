-- The most-predicted finest cells, with their place names and training density.
-- Parameters: top (default 20).
-- Needs: --predictions PRED_DIR
-- Example: geosurge sql index/ --predictions preds/ -f queries/top_cells.sql --param top=50
SET VARIABLE top = coalesce(getvariable('top'), 20);
WITH finest AS (SELECT max(level) AS level FROM cells),
counts AS (
    SELECT cell_l7 AS cell_index, count(*) AS predictions, avg(probability) AS mean_probability
    FROM predictions
    WHERE error IS NULL
    GROUP BY cell_l7
)
SELECT k.cell_index,
       c.s2_token,
       k.predictions,
       round(k.mean_probability, 4)        AS mean_probability,
       c.town,
       c.admin1,
       c.country_name,
       round(c.mean_lat, 5)                AS mean_lat,
       round(c.mean_lon, 5)                AS mean_lon,
       c.n_samples                         AS training_samples,
       round(c.n_samples / c.area_km2, 3)  AS samples_per_km2
FROM counts k
JOIN cells c ON c.level = (SELECT level FROM finest) AND c.cell_index = k.cell_index
ORDER BY k.predictions DESC, k.cell_index
LIMIT getvariable('top');
