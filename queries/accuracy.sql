-- Accuracy against a ground truth: % of images within 1 / 25 / 200 / 750 / 2500 km, median
-- error, mean GeoGuessr score. Every truth image counts: one without a prediction row, or whose
-- prediction is an error row, is wrong at every threshold and scores 0 (as `geosurge eval`).
-- Needs: --predictions PRED_DIR --truth FILE
-- Example: geosurge sql index/ --predictions preds/ --truth im2gps3k_places365.csv -f queries/accuracy.sql
WITH scored AS (
    SELECT t.id,
           haversine_km(p.lat, p.lon, t.lat, t.lon) AS km  -- NULL: no prediction / error row
    FROM truth t
    LEFT JOIN (SELECT * FROM predictions QUALIFY row_number() OVER (PARTITION BY id) = 1) p USING (id)
)
SELECT count(*)                                                  AS images,
       count(km)                                                 AS with_point,
       round(100.0 * count(*) FILTER (km <= 1)    / count(*), 2) AS pct_1km,
       round(100.0 * count(*) FILTER (km <= 25)   / count(*), 2) AS pct_25km,
       round(100.0 * count(*) FILTER (km <= 200)  / count(*), 2) AS pct_200km,
       round(100.0 * count(*) FILTER (km <= 750)  / count(*), 2) AS pct_750km,
       round(100.0 * count(*) FILTER (km <= 2500) / count(*), 2) AS pct_2500km,
       -- images without a point sort last (an infinite error)
       round(median(coalesce(km, 'Infinity'::DOUBLE)), 1)             AS median_km,
       round(sum(coalesce(geoguessr_score(km), 0)) / count(*), 1)      AS geoguessr
FROM scored;
