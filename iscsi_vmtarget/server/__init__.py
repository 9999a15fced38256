"""The asyncio server: sockets, threads and configuration around the pure layers."""
