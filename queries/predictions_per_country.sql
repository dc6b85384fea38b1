-- Predictions per country and first-level region (state, province, ...): where the finest
-- predicted cell's mean point lies, by the index's offline place names.
-- Needs: --predictions PRED_DIR
-- Example: geosurge sql index/ --predictions preds/ -f queries/predictions_per_country.sql --format csv
WITH finest AS (SELECT max(level) AS level FROM cells)
SELECT c.country_code,
       c.country_name,
       c.admin1,
       count(*)                                           AS predictions,
       round(100.0 * count(*) / sum(count(*)) OVER (), 2) AS pct
FROM predictions p
JOIN cells c ON c.level = (SELECT level FROM finest) AND c.cell_index = p.cell_l7
WHERE p.error IS NULL
GROUP BY ALL
ORDER BY predictions DESC, country_name, admin1;
