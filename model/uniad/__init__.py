"""UniAD (You et al., NeurIPS 2022): a frozen EfficientNet-B4, its features aligned at stride 16,
and a transformer with neighbour-masked attention that reconstructs them; as ADer runs it."""
