"""`python -m services.risk`: run one risk-engine worker until SIGTERM/SIGINT."""
from services.risk.app import main

main()
