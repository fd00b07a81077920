"""Evaluators every representation-learning task can use, on any backbone: features of a labelled split
(`features`), weighted k-NN (`knn`) and a linear probe on frozen features (`linear_probe`)."""
