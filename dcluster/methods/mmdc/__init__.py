"""Multi-Modal Deep Clustering (Shiran & Weinshall, ICPR 2020), the second training method.

A network with two heads: an embedding on the unit sphere, pulled towards one target point per
image drawn from a mixture of K Gaussians (the target of each image re-assigned by the
Hungarian method within every mini-batch), and a 4-way rotation classifier trained in
alternation with it. The cluster of an image is the mixture component nearest its embedding.
One epoch reads top to bottom in method.py; passes.py holds the two passes' losses, and the
other modules their parts (the targets, the Hungarian assignment, the rotations, the model).
"""
from dcluster.methods.mmdc.config import MMDCConfig, validate_mmdc
from dcluster.methods.mmdc.method import NETWORK_KEYS, MMDC, eval_network
from dcluster.methods.spec import MethodSpec

SPEC = MethodSpec("mmdc", MMDC, eval_network, NETWORK_KEYS, MMDCConfig, validate_mmdc)
