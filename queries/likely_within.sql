-- Predictions likely right to a given scale: the calibrated probability that the true point lies
-- within `km` of the answer (p_within_<km>km, one of 1, 25, 200, 750, 2500) at least
-- min_probability, most probable first: the answers to keep when you need them right to a city
-- (km = 25), a region (200), a country (750). Ranks far better than the cell probability
-- `confidence` (README "Confidence").
-- Parameters: km (default 25), min_probability (default 0.5).
-- Needs: --predictions PRED_DIR of a run with the p_within_* columns
-- Example: geosurge sql index/ --predictions preds/ -f queries/likely_within.sql \
--              --param km=25 --param min_probability=0.5 --format csv --output keep.csv
SET VARIABLE km = coalesce(getvariable('km'), 25);
SET VARIABLE min_probability = coalesce(getvariable('min_probability'), 0.5);
SELECT p.id,
       p.path,
       p.lat,
       p.lon,
       round(p.p_within, 4)      AS p_within,
       round(p.confidence, 4)    AS confidence,
       round(p.r90_km, 1)        AS r90_km,
       c.town,
       c.country_name
FROM (SELECT *,
             CASE CAST(getvariable('km') AS DOUBLE)
                 WHEN 1 THEN p_within_1km WHEN 25 THEN p_within_25km WHEN 200 THEN p_within_200km
                 WHEN 750 THEN p_within_750km WHEN 2500 THEN p_within_2500km
                 ELSE error('km must be one of 1, 25, 200, 750, 2500')
             END AS p_within
      FROM predictions) p
LEFT JOIN cells c ON c.level = (SELECT max(level) FROM cells) AND c.cell_index = p.cell_l7
WHERE p.error IS NULL
  AND p.p_within >= getvariable('min_probability')
ORDER BY p.p_within DESC, p.id;
