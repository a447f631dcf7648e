"""Image metrics: FID/KID with an offline Inception, LPIPS with offline weights."""
