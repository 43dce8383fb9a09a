"""Numbers from scores: AUC statistics, localisation, curation, the papers' published figures."""
