"""SimpleNet (CVPR 2023) as ADer runs it: adapted backbone features and a discriminator of noisy ones."""
