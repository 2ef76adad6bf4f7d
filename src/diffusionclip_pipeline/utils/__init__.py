"""Small utilities every layer may use: argument checks (`checks`), the one atomic writer (`io`), the lock that
serialises users of one denoiser (`locking`) and quiet model loading / thread settings (`logging`).

Nothing here imports a model, a pipeline, training or the commands.
"""
