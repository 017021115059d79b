"""DeepCluster (Caron et al., ECCV 2018), the first training method: k-means on the
features of the whole data set gives every image a pseudo-label, and the network is trained
to predict them, alternately. One epoch reads top to bottom in method.py; the feature bank
(feature_bank.py) lets it cluster the training pass's own features instead of an extra pass.
"""
from dcluster.methods.deepcluster.method import NETWORK_KEYS, DeepCluster, eval_network
from dcluster.methods.spec import MethodSpec

SPEC = MethodSpec("deepcluster", DeepCluster, eval_network, NETWORK_KEYS)
