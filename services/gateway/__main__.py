from shared.runtime import main
from services.gateway.app import SPEC

main(SPEC)
