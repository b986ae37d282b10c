"""Memory: layouts of registered tensors, transfer planning, dxl's own HOST pools, registered
memory moved onto shared memory, and copies within this process. No I/O with peers here."""
