"""Route tables of frameworks whose routers cachemw does not model itself (Flask, Django): their routers decide."""
