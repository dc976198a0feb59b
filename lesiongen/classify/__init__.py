"""Classification: the classifier registry and training loop, its data, per-subgroup evaluation, pure metrics and
the one real / synthetic / mixed comparison."""
