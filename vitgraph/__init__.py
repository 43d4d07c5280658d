"""vitgraph: structured pruning of Vision Transformers as torch.fx passes."""
