"""Submitting DeepCluster runs to Slurm through submitit (`dcluster submit`)."""
