"""Multi-Modal Deep Clustering (Shiran & Weinshall, ICPR 2020), the second training method.

A network with two heads: an embedding on the unit sphere, pulled towards one target point per
image drawn from a mixture of K Gaussians (the target of each image re-assigned by the
Hungarian method within every mini-batch), and a 4-way rotation classifier trained in
alternation with it. The cluster of an image is the mixture component nearest its embedding.
`train_mmdc` (train.py) is the epoch loop; the other modules are its parts.
"""
