"""Stage 4: training the network, single process or under DDP, with progress reporting."""
