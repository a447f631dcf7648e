"""Canonicalisation (paper sec. 3.3, eq. 6-10): GAN inversion into the Stage-1 generator, the
frontal/neutral re-render x_hat, its CLIP embedding r_x, and the sharded, resumable cache Stage 2 reads.

Modules: ``config`` (typed settings), ``inversion`` (eq. 9-10), ``pipeline`` (dataset -> shards),
``cache`` (manifest, atomic shards, reader), ``report`` (LPIPS histogram, worst/best grids).
"""
