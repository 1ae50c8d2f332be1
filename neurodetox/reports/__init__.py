"""What runs write for people: training curves and tables, the study page, the metrics log."""
