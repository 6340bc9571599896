-- Nothing to undo: 000004's down drops the columns.
SELECT 1;
