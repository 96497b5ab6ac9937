"""dapo-mcore: Direct Advantage Policy Optimization (arXiv 2412.18279) on megatron-core."""
__version__ = "0.1.0"
