"""`dcluster eval linear | knn | clusters`: what the features of a trained (or untrained)
network are worth, by the protocols of the papers.

Each protocol has a core that works on arrays or tensors (knn.py, clusters.py, linear.py, so
it can be tested on synthetic features) and a driver in protocols.py that reads a run
directory, a checkpoint or a config (target.py, network.py), extracts features through the
training loaders (features.py, splits.py) and reports (report.py).
"""
