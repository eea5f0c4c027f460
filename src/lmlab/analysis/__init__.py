"""Reading results: runs table, compare, diff, report, lineage, data and prediction inspection, memory planner."""
