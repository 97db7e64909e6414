from shared.runtime import main
from services.escrow.app import SPEC

main(SPEC)
