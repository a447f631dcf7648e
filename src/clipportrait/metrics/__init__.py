"""Image metrics: FID/KID with an offline Inception, LPIPS with offline weights, CLIP score and
prompt diversity (`text`), synthetic-world text-control and silhouette accuracy (`control`)."""
