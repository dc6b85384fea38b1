-- Per-level agreement of predicted and true cells: at each level, the % of truth images whose
-- predicted cell is the cell holding the true point (images without a prediction count as
-- wrong), and the % of true points that lie in some cell of that level at all (the ceiling).
-- Needs: --predictions PRED_DIR --truth FILE (the truth's cells come from INDEX_DIR)
-- Example: geosurge sql index/ --predictions preds/ --truth yfcc4k.csv -f queries/level_agreement.sql
WITH pairs AS (
    SELECT unnest(range(1, 8)) AS level,
           unnest([p.cell_l1, p.cell_l2, p.cell_l3, p.cell_l4, p.cell_l5, p.cell_l6, p.cell_l7]) AS predicted,
           unnest([t.true_cell_l1, t.true_cell_l2, t.true_cell_l3, t.true_cell_l4, t.true_cell_l5,
                   t.true_cell_l6, t.true_cell_l7]) AS actual
    FROM truth t
    LEFT JOIN (SELECT * FROM predictions QUALIFY row_number() OVER (PARTITION BY id) = 1) p USING (id)
)
SELECT level,
       count(*)                                                                    AS images,
       round(100.0 * count(*) FILTER (predicted = actual) / count(*), 2)           AS pct_same_cell,
       round(100.0 * count(actual) / count(*), 2)                                  AS pct_truth_in_a_cell
FROM pairs
GROUP BY level
ORDER BY level;
