"""3D control: EG3D cameras, morphable models (FLAME, procedural head), the surface-field
deformation of eq. 4-5, mesh renders for the discriminator and overlays for checking them."""
