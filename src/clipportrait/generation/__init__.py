"""Text- and 3D-controlled portrait generation from a Stage-2 checkpoint (task=generate).

One job per module:

- `prompts`       reading prompts (list or file) and refusing empty or over-long ones
- `views`         camera presets, yaw/pitch <-> EG3D labels, turntable yaw paths
- `morphable`     morphable conditioning: expression presets, explicit vectors, dataset rows
- `modality_gap`  the optional mean text-to-image offset applied to text embeddings
- `pipeline`      text -> embedding -> portrait, with measured latencies
- `writers`       PNG grids/strips, depth maps, MP4 turntables
"""
