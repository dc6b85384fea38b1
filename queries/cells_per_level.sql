-- The hierarchy at a glance: cells, training samples, and cell sizes per level.
-- Needs: INDEX_DIR only
-- Example: geosurge sql index/ -f queries/cells_per_level.sql
SELECT c.level,
       l.tau_max,
       count(*)                              AS cells,
       sum(c.n_samples)                      AS training_samples,
       min(c.s2_level)                       AS min_s2_level,
       max(c.s2_level)                       AS max_s2_level,
       round(median(c.area_km2), 1)          AS median_area_km2,
       count(DISTINCT c.country_code)        AS countries,
       l.temperature
FROM cells c
JOIN levels l USING (level)
GROUP BY c.level, l.tau_max, l.temperature
ORDER BY c.level;
