-- Cell mean vs gallery-refined answers (`geosurge gallery`): per point_source (how lat/lon were
-- made: cell_mean, neighbour, neighbours), the images, the median similarity of the nearest
-- reference, and the % within 1 / 25 km and the median error of the refined point (lat/lon)
-- and of the best cell's mean point (cell_lat/cell_lon); the last row is all images. Error rows
-- and images without a prediction are left out (`accuracy.sql` counts them).
-- Needs: --predictions PRED_DIR (written with the gallery columns) --truth FILE
-- Example: geosurge sql index/ --predictions preds/ --truth truth.csv -f queries/refinement.sql
WITH scored AS (
    SELECT p.point_source,
           p.neighbour_similarity                               AS similarity,
           haversine_km(p.lat, p.lon, t.lat, t.lon)             AS refined_km,
           haversine_km(p.cell_lat, p.cell_lon, t.lat, t.lon)   AS cell_km
    FROM truth t
    JOIN (SELECT * FROM predictions QUALIFY row_number() OVER (PARTITION BY id) = 1) p USING (id)
    WHERE p.error IS NULL
)
SELECT coalesce(point_source, 'all')                                      AS point_source,
       count(*)                                                           AS images,
       round(median(similarity), 3)                                       AS median_similarity,
       round(100.0 * count(*) FILTER (refined_km <= 1)  / count(*), 2)    AS refined_pct_1km,
       round(100.0 * count(*) FILTER (cell_km <= 1)     / count(*), 2)    AS cell_pct_1km,
       round(100.0 * count(*) FILTER (refined_km <= 25) / count(*), 2)    AS refined_pct_25km,
       round(100.0 * count(*) FILTER (cell_km <= 25)    / count(*), 2)    AS cell_pct_25km,
       round(median(refined_km), 2)                                       AS refined_median_km,
       round(median(cell_km), 2)                                          AS cell_median_km,
       -- images whose refined point is closer to the truth than the cell's mean point
       round(100.0 * count(*) FILTER (refined_km < cell_km) / count(*), 2) AS pct_refined_closer
FROM scored
GROUP BY ROLLUP (point_source)
ORDER BY point_source NULLS LAST;
