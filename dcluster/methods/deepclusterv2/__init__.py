"""DeepCluster-v2 (Caron et al., "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", NeurIPS 2020, appendix; facebookresearch/swav main_deepclusterv2.py),
the third training method.

A backbone with a projection head to L2-normalised embeddings and, per clustering head, a
frozen linear layer of prototypes. Each epoch starts with spherical k-means of the
embeddings a memory bank kept from the previous epoch; the centroids become the prototypes,
and the network is trained to predict every view's cluster of its image (cross-entropy of
the prototype scores over a temperature). The optimiser is SGD wrapped in LARS, its lr a
linear warm-up then a cosine decay. One epoch reads top to bottom in method.py; the other
modules are its parts.
"""
from dcluster.methods.deepclusterv2.config import DeepClusterV2Config, validate_deepclusterv2
from dcluster.methods.deepclusterv2.method import NETWORK_KEYS, DeepClusterV2, eval_network
from dcluster.methods.spec import MethodSpec

SPEC = MethodSpec("deepclusterv2", DeepClusterV2, eval_network, NETWORK_KEYS,
                  DeepClusterV2Config, validate_deepclusterv2)
