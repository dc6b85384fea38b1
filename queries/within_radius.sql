-- Images predicted within radius_km of a point, nearest first.
-- Parameters (--param NAME=VALUE): lat, lon (degrees; default the Eiffel Tower), radius_km (default 25).
-- Needs: --predictions PRED_DIR
-- Example: geosurge sql index/ --predictions preds/ -f queries/within_radius.sql \
--              --param lat=40.6892 --param lon=-74.0445 --param radius_km=10
SET VARIABLE lat = coalesce(getvariable('lat'), 48.8584);
SET VARIABLE lon = coalesce(getvariable('lon'), 2.2945);
SET VARIABLE radius_km = coalesce(getvariable('radius_km'), 25);
SELECT id,
       path,
       lat,
       lon,
       round(haversine_km(lat, lon, getvariable('lat'), getvariable('lon')), 3) AS km,
       probability
FROM predictions
WHERE error IS NULL
  AND within_km(lat, lon, getvariable('lat'), getvariable('lon'), getvariable('radius_km'))
ORDER BY km, id;
