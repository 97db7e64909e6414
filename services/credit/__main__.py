from shared.runtime import main
from services.credit.app import SPEC

main(SPEC)
